"""Resume: a run killed after a save and resumed with --resume ends exactly where the same run,
never interrupted, ends: the same weights, bit for bit, and the same logged losses (on CPU)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import common
import dpo
import ppo
import pretrain
import reward
import sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_same_run(a, b, keys):
    wa, wb = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rows = [[{k: r[k] for k in keys if k in r} for r in map(json.loads, open(os.path.join(p, "metrics.jsonl")))]
            for p in (a, b)]
    assert rows[0] == rows[1] and len(rows[0]) > 2
    assert not os.path.exists(os.path.join(b, "resume.json"))  # a finished run leaves no resume state


def interrupt_at(monkeypatch, module, name, step):
    """Raise KeyboardInterrupt (as a kill would stop the run) at the given call of module.name with gradients."""
    real, calls = getattr(module, name), [0]

    def dying(*args, **kwargs):
        if torch.is_grad_enabled():
            calls[0] += 1
            if calls[0] > step:
                raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(module, name, dying)


@pytest.fixture
def one_thread():
    """The killed run is a subprocess with one thread: float sums depend on the thread count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_sft_killed_with_sigkill_resumes_to_the_same_weights(tiny_chain, tmp_path, one_thread):
    args = dict(init=tiny_chain["base"], n_demos=400, epochs=3, batch_size=8, log_every=4, n_samples=1, device="cpu",
                save_every=5)
    sft.main(sft.Config(out_dir=str(tmp_path / "whole"), **args))
    killed = tmp_path / "killed"
    argv = [sys.executable, "sft.py", "--out_dir", str(killed)] + [f"--{k}={v}" for k, v in args.items()]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (killed / "resume.json").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not killed.exists():  # killed between a later save's two renames: the move the --resume error asks for
        os.rename(f"{killed}.old", killed)
    step = json.loads((killed / "resume.json").read_text())["step"]
    assert 5 <= step < 137  # killed mid-run: 137 steps in all
    sft.main(sft.Config(out_dir=str(killed), resume=True, **args))
    assert_same_run(tmp_path / "whole", killed, ("step", "loss", "val_loss", "lr"))


def test_pretrain_interrupted_and_resumed_matches_the_whole_run(tmp_path, monkeypatch):
    """The batch sampler's generator and the optimizer come back, and the hashed token stream matches."""
    args = dict(max_steps=12, n_docs=300, batch_size=8, warmup_steps=3, log_every=2, eval_every=6, eval_batches=1,
                device="cpu", save_every=4, n_layer=1, n_head=2, n_embd=32, block_size=32)
    pretrain.main(pretrain.Config(out_dir=str(tmp_path / "whole"), **args))
    real, calls = pretrain.get_batch, [0]

    def dying(*a, **k):  # dies drawing the batch of step 6, after the save of step 4
        calls[0] += 1
        if calls[0] > 6:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(pretrain, "get_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(pretrain.Config(out_dir=str(tmp_path / "killed"), **args))
    monkeypatch.undo()
    assert json.loads((tmp_path / "killed" / "resume.json").read_text())["step"] == 4
    pretrain.main(pretrain.Config(out_dir=str(tmp_path / "killed"), resume=True, **args))
    assert_same_run(tmp_path / "whole", tmp_path / "killed", ("step", "loss", "lr", "val_loss"))
    # a --data corpus edited after the interruption, with the same flags: its hash tells
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"the cat number {i} sat on the mat." for i in range(400)))
    data_args = {**args, "data": str(corpus), "tokenizer": "builtin"}
    calls[0] = 0
    monkeypatch.setattr(pretrain, "get_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(pretrain.Config(out_dir=str(tmp_path / "file"), **data_args))
    monkeypatch.undo()
    corpus.write_text(corpus.read_text().replace("cat number 7 sat", "dog number 7 sat"))
    with pytest.raises(common.UserError, match="the data file changed since"):
        pretrain.main(pretrain.Config(out_dir=str(tmp_path / "file"), resume=True, **data_args))


def test_resume_on_a_machine_with_other_cuda_devices(tmp_path, monkeypatch):
    """A state written where torch saw no CUDA device, one or two resumes where it sees one or two: each device's
    generator comes back if the interrupted run kept it, and the others keep their seeding (the run went through
    a KeyError on the first device it had not seen). A run on the CPU of a GPU machine keeps no CUDA state: reading
    it made a CUDA context on GPU 0 (memory, and a process other users of the GPU see)."""
    args = dict(max_steps=8, n_docs=300, batch_size=8, warmup_steps=3, log_every=2, eval_every=6, eval_batches=1,
                device="cpu", save_every=4, n_layer=1, n_head=2, n_embd=32, block_size=32)
    pretrain.main(pretrain.Config(out_dir=str(tmp_path / "whole"), **args))
    def no_context():
        raise AssertionError("a run on the CPU made a CUDA context")
    for then, now in [(0, 2), ("cpu", 2), (1, 2), (2, 2), (2, 1)]:
        out, cuda_states = tmp_path / f"then{then}now{now}", {}
        monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(then))
        if then == "cpu":  # a GPU machine, with the run on its CPU
            monkeypatch.setattr(torch.cuda, "get_rng_state_all", no_context)
        elif then:  # a run on CUDA: device i's generator state is a tensor of 7 + i
            monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
            monkeypatch.setattr(torch.cuda, "get_rng_state_all",
                                lambda n=then: [torch.full((16,), 7 + i, dtype=torch.uint8) for i in range(n)])
        interrupt_at(monkeypatch, pretrain, "get_batch", 6)  # dies in step 6, after the save of step 4
        with pytest.raises(KeyboardInterrupt):
            pretrain.main(pretrain.Config(out_dir=str(out), **args))
        monkeypatch.undo()
        assert json.loads((out / "resume.json").read_text())["step"] == 4
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda n=now: n)
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda n=now: [torch.zeros(16, dtype=torch.uint8)] * n)
        monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: cuda_states.update({device: state}))
        pretrain.main(pretrain.Config(out_dir=str(out), resume=True, **args))
        monkeypatch.undo()
        assert_same_run(tmp_path / "whole", out, ("step", "loss", "lr", "val_loss"))
        assert sorted(cuda_states) == list(range(min(then if then != "cpu" else 0, now)))
        assert all((state == 7 + i).all() for i, state in cuda_states.items())
    # --device auto resolved to another device type than the run's: refused (a CUDA generator cannot take a CPU
    # generator's state, and the precision would change), not a RuntimeError from inside torch
    interrupt_at(monkeypatch, pretrain, "get_batch", 6)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(pretrain.Config(out_dir=str(tmp_path / "on_cuda"), **args))
    monkeypatch.undo()
    state = json.loads((tmp_path / "on_cuda" / "resume.json").read_text())
    assert state["device"] == "cpu"
    (tmp_path / "on_cuda" / "resume.json").write_text(json.dumps({**state, "device": "cuda"}))
    with pytest.raises(common.UserError, match="was written by a run on cuda, and this one runs on cpu"):
        pretrain.main(pretrain.Config(out_dir=str(tmp_path / "on_cuda"), resume=True, **args))


def test_dpo_interrupted_and_resumed_matches_the_whole_run(tiny_chain, tmp_path, monkeypatch):
    args = dict(init=tiny_chain["sft"], n_prompts=20, pairs_per_prompt=2, sft_samples=1, batch_size=8, micro_batch_size=4,
                length_groups=2, log_every=2, eval_every=4, n_samples=1, device="cpu", save_every=3)
    dpo.main(dpo.Config(out_dir=str(tmp_path / "whole"), **args))
    interrupt_at(monkeypatch, dpo, "dpo_loss", 2 * 7)  # two micro-batches a step: dies in step 7, after the save of step 6
    with pytest.raises(KeyboardInterrupt):
        dpo.main(dpo.Config(out_dir=str(tmp_path / "killed"), **args))
    monkeypatch.undo()
    assert json.loads((tmp_path / "killed" / "resume.json").read_text())["step"] == 6
    dpo.main(dpo.Config(out_dir=str(tmp_path / "killed"), resume=True, **args))
    assert_same_run(tmp_path / "whole", tmp_path / "killed", ("step", "loss", "accuracy", "margin", "val_loss"))


def test_resume_may_change_the_micro_batch_size(tiny_chain, tmp_path, monkeypatch, capsys):
    """A run that ran out of memory goes on in smaller micro-batches: the same gradients, added in another
    order, so the weights end close to the uninterrupted run's (not bit for bit)."""
    args = dict(init=tiny_chain["sft"], n_prompts=20, pairs_per_prompt=2, sft_samples=1, batch_size=8, length_groups=2,
                log_every=2, eval_every=4, n_samples=1, device="cpu", save_every=3)
    dpo.main(dpo.Config(out_dir=str(tmp_path / "whole"), micro_batch_size=4, **args))
    interrupt_at(monkeypatch, dpo, "dpo_loss", 2 * 7)  # two micro-batches a step: dies in step 7, after the save of step 6
    with pytest.raises(KeyboardInterrupt):
        dpo.main(dpo.Config(out_dir=str(tmp_path / "killed"), micro_batch_size=4, **args))
    monkeypatch.undo()
    passes, real = [], dpo.dpo_loss

    def counted(*a):  # the pairs of each training pass
        if torch.is_grad_enabled():
            passes.append(len(a[0]))
        return real(*a)
    monkeypatch.setattr(dpo, "dpo_loss", counted)
    capsys.readouterr()
    dpo.main(dpo.Config(out_dir=str(tmp_path / "killed"), resume=True, micro_batch_size=2, **args))
    assert passes == [2] * 4 * 2  # it did go on in micro-batches of 2 pairs: 4 a step, steps 7 and 8
    assert "after step 6 (--micro_batch_size 4 -> 2)\n" in capsys.readouterr().out  # the log says so
    whole, resumed = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("whole", "killed"))
    for k in whole:
        torch.testing.assert_close(resumed[k], whole[k], rtol=0, atol=1e-5)


def test_reward_interrupted_and_resumed_matches_the_whole_run(tiny_chain, tmp_path, monkeypatch):
    args = dict(init=tiny_chain["sft"], n_prompts=40, pairs_per_prompt=2, sft_samples=1, norm_prompts=16, batch_size=8,
                log_every=1, eval_every=5, device="cpu", save_every=4)
    reward.main(reward.Config(out_dir=str(tmp_path / "whole"), **args))
    interrupt_at(monkeypatch, reward, "bradley_terry_loss", 6)
    with pytest.raises(KeyboardInterrupt):
        reward.main(reward.Config(out_dir=str(tmp_path / "killed"), **args))
    monkeypatch.undo()
    state = json.loads((tmp_path / "killed" / "resume.json").read_text())
    assert state["step"] == 4 and state["stage"] == "reward"
    reward.main(reward.Config(out_dir=str(tmp_path / "killed"), resume=True, **args))
    assert_same_run(tmp_path / "whole", tmp_path / "killed", ("step", "loss", "accuracy", "val_accuracy"))
    norms = [json.loads((tmp_path / p / "config.json").read_text())["reward_norm"] for p in ("whole", "killed")]
    assert norms[0] == norms[1]  # the sampler's generator was restored too


def test_ppo_interrupted_and_resumed_matches_the_whole_run(tiny_chain, tmp_path, monkeypatch):
    args = dict(policy=tiny_chain["sft"], reward=tiny_chain["rm"], iterations=4, rollout_batch=8, minibatch_size=4,
                ppo_epochs=1, max_new_tokens=8, warmup_iterations=1, adaptive_kl=True, target_kl=0.01, kl_horizon=10,
                device="cpu", save_every=2)
    ppo.main(ppo.Config(out_dir=str(tmp_path / "whole"), **args))
    interrupt_at(monkeypatch, ppo, "policy_loss", 2 * 3)  # two minibatches an iteration: dies in iteration 3
    with pytest.raises(KeyboardInterrupt):
        ppo.main(ppo.Config(out_dir=str(tmp_path / "killed"), **args))
    monkeypatch.undo()
    ppo.main(ppo.Config(out_dir=str(tmp_path / "killed"), resume=True, **args))
    assert_same_run(tmp_path / "whole", tmp_path / "killed", ("iteration", "score", "kl", "pg_loss", "vf_loss", "kl_coef"))
    rows = [json.loads(line) for line in open(tmp_path / "whole" / "metrics.jsonl")]
    assert rows[-1]["kl_coef"] != rows[0]["kl_coef"]  # the adaptive controller moved, and its value was resumed


def test_resume_refuses_other_arguments(tiny_chain, tmp_path, monkeypatch):
    args = dict(init=tiny_chain["sft"], n_prompts=20, pairs_per_prompt=2, sft_samples=0, batch_size=8, length_groups=1,
                n_samples=1, device="cpu", save_every=2, out_dir=str(tmp_path / "run"))
    interrupt_at(monkeypatch, dpo, "dpo_loss", 3)  # one pass a step: dies in the third, after the save at two steps done
    with pytest.raises(KeyboardInterrupt):
        dpo.main(dpo.Config(**args))
    with pytest.raises(dpo.common.UserError, match=r"--resume: --beta is 0\.3, but the interrupted run \(.*resume.json\) used 0\.5 "
                                                   r"\(of this stage's flags only --micro_batch_size, --save_every may change\)$"):
        dpo.main(dpo.Config(**{**args, "beta": 0.3, "resume": True}))
    weights = tmp_path / "run" / "model.safetensors"  # damaged since: named, not a safetensors traceback
    weights.write_bytes(weights.read_bytes()[:64])
    with pytest.raises(dpo.common.UserError, match=r"^--resume: .*run/model.safetensors cannot be read: "):
        dpo.main(dpo.Config(**{**args, "resume": True}))


def test_resume_takes_paths_however_spelled_and_points_at_a_state_left_in_old(tiny_chain, tmp_path, monkeypatch):
    """--resume compared path flags as strings: `--out_dir run/` or `--init ./x` were refused. And a
    save killed between its two renames leaves the state at out_dir.old: --resume said there was
    none, and a fresh run would have replaced it."""
    args = dict(init=tiny_chain["sft"], n_prompts=20, pairs_per_prompt=2, sft_samples=0, batch_size=8, length_groups=1,
                n_samples=1, device="cpu", save_every=2, out_dir=str(tmp_path / "run"))
    dpo.main(dpo.Config(**args))  # the whole run
    (tmp_path / "run").rename(tmp_path / "whole")
    interrupt_at(monkeypatch, dpo, "dpo_loss", 3)
    with pytest.raises(KeyboardInterrupt):
        dpo.main(dpo.Config(**args))
    monkeypatch.undo()
    (tmp_path / "run").rename(tmp_path / "run.old")  # as if killed between the renames of its next save
    for out_dir in (args["out_dir"], args["out_dir"] + "/"):
        with pytest.raises(dpo.common.UserError, match=r"^--resume: a save killed between its two renames left the last state "
                                                       r"at \S+run\.old: move it back \(mv \S+run\.old \S+run\) and resume$"):
            dpo.main(dpo.Config(**{**args, "resume": True, "out_dir": out_dir}))
    (tmp_path / "run.old").rename(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    dpo.main(dpo.Config(**{**args, "resume": True, "out_dir": "run/", "init": os.path.relpath(tiny_chain["sft"], tmp_path)}))
    assert_same_run(tmp_path / "whole", tmp_path / "run", ("step", "loss", "margin"))


def test_a_save_after_a_kill_between_the_renames_starts_from_the_last_good_checkpoint(tmp_path):
    (tmp_path / "ckpt.old").mkdir()  # the last good one, out of its place; and no ckpt
    (tmp_path / "ckpt.old" / "notes.txt").write_text("mine")
    with dpo.common.atomic_directory(str(tmp_path / "ckpt")) as tmp:
        open(os.path.join(tmp, "config.json"), "w").write("{}")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["config.json", "notes.txt"] and not (tmp_path / "ckpt.old").exists()


def test_reward_resume_state_without_its_average_is_refused_clearly(tiny_chain, tmp_path, monkeypatch):
    """Resume state written before reward.py kept a moving average (no --ema in its arguments, no
    average among its tensors) gets a one-line refusal, not a raw load_state_dict error."""
    args = dict(init=tiny_chain["sft"], n_prompts=40, pairs_per_prompt=2, sft_samples=0, norm_prompts=16, batch_size=8,
                device="cpu", save_every=2, out_dir=str(tmp_path / "run"))
    interrupt_at(monkeypatch, reward, "bradley_terry_loss", 4)
    with pytest.raises(KeyboardInterrupt):
        reward.main(reward.Config(ema=0.0, **args))  # no average: as the older version wrote it
    monkeypatch.undo()
    path = tmp_path / "run" / "resume.json"
    state = json.loads(path.read_text())
    del state["args"]["ema"]  # the older version had no such argument
    path.write_text(json.dumps(state))
    with pytest.raises(reward.common.UserError, match=r"--resume: .*resume.json holds no ema model"):
        reward.main(reward.Config(resume=True, **args))


def test_resume_refuses_a_data_file_that_changed(tiny_chain, tmp_path, monkeypatch):
    """The arguments are checked, and so is the data: a file with rows added or removed since the run
    began would have it go on over another shuffle (or index past the end of the new one)."""
    data = tmp_path / "demos.jsonl"
    rows = [{"prompt": f"Human: Where does creature {i} live?\n\nAssistant:", "completion": " It lives in Velmor."}
            for i in range(40)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = dict(init=tiny_chain["base"], data=str(data), batch_size=8, n_samples=1, device="cpu", save_every=2,
                out_dir=str(tmp_path / "sft"))
    interrupt_at(monkeypatch, sft, "sft_loss", 12)  # after the save of step 2
    with pytest.raises(KeyboardInterrupt):
        sft.main(sft.Config(**args))
    monkeypatch.undo()
    assert (tmp_path / "sft" / "resume.json").exists()
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[:30]))
    with pytest.raises(common.UserError, match=r"--resume: the training data is \{'examples': 28, 'tokens': \d+, 'sha256': '\w+'\}, "
                                               r"but the interrupted run .* had \{'examples': 38, .*the data file changed"):
        sft.main(sft.Config(**args, resume=True))
    # the same rows in the reverse order: the counts agree, the hash does not
    data.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    with pytest.raises(common.UserError, match=r"--resume: the training data is \{'examples': 38, 'tokens': (\d+), 'sha256': '\w+'\}, "
                                               r"but the interrupted run .* had \{'examples': 38, 'tokens': \1, .*the data file changed"):
        sft.main(sft.Config(**args, resume=True))
    # the state of an older version, which kept the counts only: those are compared, and they agree
    path = tmp_path / "sft" / "resume.json"
    state = json.loads(path.read_text())
    del state["data"]["sha256"]
    path.write_text(json.dumps(state))
    sft.main(sft.Config(**args, resume=True))
    assert not path.exists()  # the run went on to its end
