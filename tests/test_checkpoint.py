"""Checkpoints: bit-exact round trip, atomic writes, strict loading with clear refusals."""

import json
import os

import pytest
import torch

import model as model_module
from model import GPT, CheckpointError, GPTConfig, load_checkpoint, save_checkpoint

CFG = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16)
META = {"tokenizer": "builtin", "stage": "test", "parent": None, "args": {"lr": 0.1}, "metrics": {"loss": 1.5}}


def tiny(head="lm", seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**CFG.__dict__, "head": head}))


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("head", ["lm", "scalar"])
def test_round_trip_is_bit_exact(tmp_path, head):
    m = tiny(head)
    rows = [{"step": 0, "loss": 2.0}, {"step": 1, "loss": 1.0}]
    save_checkpoint(tmp_path / "ck", m, META, rows)
    loaded, info = load_checkpoint(tmp_path / "ck")
    assert_same_weights(m, loaded)
    assert loaded.config == m.config
    assert {k: info[k] for k in META} == META
    lines = (tmp_path / "ck" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows
    assert sorted(os.listdir(tmp_path)) == ["ck"]  # no temporary directory left behind


def test_failed_write_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ck"
    old = tiny(seed=0)
    save_checkpoint(path, old, META)
    before = {f: (path / f).read_bytes() for f in os.listdir(path)}

    def crash(state, filename):  # write half a file, then die, as a full disk or a kill would
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(model_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, tiny(seed=1), META)
    assert {f: (path / f).read_bytes() for f in os.listdir(path)} == before
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert_same_weights(old, load_checkpoint(path)[0])


def test_the_new_files_reach_the_disk_before_the_old_checkpoint_goes(tmp_path, monkeypatch):
    """Renames alone are atomic against a crash of the process, not of the machine: every new file
    (and the directory's entries) is flushed first, and the parent directory after the renames."""
    import common
    events, real_fsync, real_rename = [], common.fsync, os.rename
    monkeypatch.setattr(common, "fsync", lambda p: (events.append(("fsync", os.path.basename(p))), real_fsync(p)))
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", os.path.basename(a))), real_rename(a, b)))
    save_checkpoint(tmp_path / "ck", tiny(seed=0), META)
    save_checkpoint(tmp_path / "ck", tiny(seed=1), META, [{"step": 0}])
    second = events[events.index(("fsync", tmp_path.name)) + 1:]  # after the first save's last flush
    first_rename = next(i for i, (what, _) in enumerate(second) if what == "rename")
    flushed = {name for what, name in second[:first_rename] if what == "fsync"}
    assert {"model.safetensors", "config.json", "metrics.jsonl"} <= flushed and any(".tmp" in n for n in flushed)
    assert second[-1] == ("fsync", tmp_path.name)
    assert_same_weights(tiny(seed=1), load_checkpoint(tmp_path / "ck")[0])


def test_a_mount_that_cannot_flush_directories_still_saves(tmp_path, monkeypatch):
    """Some network and FUSE mounts refuse fsync on a directory (EINVAL): the save goes on without it.
    A file that cannot be flushed fails the save, which leaves the old checkpoint and no temporary."""
    import errno
    import stat
    real = os.fsync

    def refuse_directories(fd):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "Invalid argument")
        real(fd)
    monkeypatch.setattr(os, "fsync", refuse_directories)
    save_checkpoint(tmp_path / "ck", tiny(seed=0), META)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    with pytest.raises(OSError, match="I/O error"):
        save_checkpoint(tmp_path / "ck", tiny(seed=1), META)
    assert sorted(os.listdir(tmp_path)) == ["ck"]
    assert_same_weights(tiny(seed=0), load_checkpoint(tmp_path / "ck")[0])


def test_overwrite_replaces_every_file(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny(seed=0), META, [{"step": 0}])
    new = tiny(seed=1)
    save_checkpoint(tmp_path / "ck", new, {**META, "stage": "second"})
    loaded, info = load_checkpoint(tmp_path / "ck")
    assert_same_weights(new, loaded)
    assert info["stage"] == "second" and (tmp_path / "ck" / "metrics.jsonl").read_text() == ""


def test_refuses_a_mismatched_tokenizer(tmp_path):
    save_checkpoint(tmp_path / "ck", tiny(), META)
    with pytest.raises(CheckpointError, match=r"tokenizer 'builtin', but this run uses 'gpt2'"):
        load_checkpoint(tmp_path / "ck", tokenizer="gpt2")


def test_refuses_the_wrong_head(tmp_path):
    save_checkpoint(tmp_path / "rm", tiny("scalar"), META)
    with pytest.raises(CheckpointError, match="has a scalar head, but a lm head is needed"):
        load_checkpoint(tmp_path / "rm", head="lm")


def test_refuses_weights_whose_shape_disagrees_with_the_config(tmp_path):
    path = tmp_path / "ck"
    save_checkpoint(path, tiny(), META)
    info = json.loads((path / "config.json").read_text())
    info["model"]["vocab_size"] = 60
    (path / "config.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"transformer.wte.weight has shape \(50, 16\), the model expects \(60, 16\)"):
        load_checkpoint(path)


def test_refuses_missing_or_extra_tensors(tmp_path):
    path = tmp_path / "ck"
    save_checkpoint(path, tiny("scalar"), META)
    info = json.loads((path / "config.json").read_text())
    info["model"]["head"] = "lm"  # the weights still hold score.weight
    (path / "config.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"unexpected \['score.weight'\]"):
        load_checkpoint(path)
    info["model"]["head"] = "scalar"  # and the other way: a scalar head over an lm's weights
    save_checkpoint(path, tiny("lm"), META)
    (path / "config.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match=r"does not match the model: missing \['score.weight'\], unexpected \[\]"):
        load_checkpoint(path)


def test_refuses_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_checkpoint(tmp_path / "nothing")
    (tmp_path / "ck.old").mkdir()  # a save killed between its two renames left only the previous checkpoint
    with pytest.raises(CheckpointError, match=r"ck: no such checkpoint directory \(an interrupted save left the "
                                              r"previous one at .*ck\.old\)"):
        load_checkpoint(tmp_path / "ck")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="is not a checkpoint: it has no config.json"):
        load_checkpoint(tmp_path / "empty")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="model.safetensors is a file: a checkpoint is a directory"):
        load_checkpoint(tmp_path / "model.safetensors")
    (tmp_path / "empty" / "config.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="empty/config.json is not a JSON object"):
        load_checkpoint(tmp_path / "empty")


def test_a_damaged_checkpoint_is_refused_by_file_name(tmp_path):
    """A truncated weights file, a config.json that is not text, sizes that are not positive
    integers: a CheckpointError naming the file, not a traceback from safetensors or json."""
    save_checkpoint(tmp_path / "ck", tiny(), META)
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/ck/model.safetensors cannot be read: "):
        load_checkpoint(tmp_path / "ck")
    save_checkpoint(tmp_path / "ck", tiny(), META)
    config = tmp_path / "ck" / "config.json"
    good = config.read_text()
    config.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}/ck/config.json is not valid JSON"):
        load_checkpoint(tmp_path / "ck")
    for field, value in (("n_layer", None), ("n_embd", 0), ("vocab_size", 50.5), ("dropout", 1.0)):
        info = json.loads(good)
        info["model"][field] = value
        config.write_text(json.dumps(info))
        with pytest.raises(CheckpointError, match=rf"ck/config.json has no valid model config: {field} must be"):
            load_checkpoint(tmp_path / "ck")


def test_a_changed_tokenizer_is_refused(tmp_path):
    from common import UserError
    from data.tokenizer import get_tokenizer, tokenizer_for
    tok = get_tokenizer("builtin")
    info = {**tok.identity, "model": {"vocab_size": tok.n_vocab}}
    assert tokenizer_for(info, "out/x") is not None
    with pytest.raises(UserError, match="out/x was trained with another builtin tokenizer"):
        tokenizer_for({**info, "tokenizer_fingerprint": "0" * 16}, "out/x")
    with pytest.raises(UserError, match=f"vocabulary {tok.n_vocab + 1}"):
        tokenizer_for({**info, "model": {"vocab_size": tok.n_vocab + 1}}, "out/x")
