"""Bad input: each is refused with one line that names the file, line or argument, exit status 1,
and the checkpoint already in out_dir is left byte for byte as it was. Numerical faults: a NaN loss
stops the stage at its step, keeping the last good checkpoint; PPO skips an exploding ratio."""

import contextlib
import json
import math
import os
import shutil
import sys
from dataclasses import asdict

import pytest
import torch

import common
import dpo
import ppo
import reward
import sft
from model import GPT, GPTConfig, export_hf, load_checkpoint, save_checkpoint


def snapshot(path):
    return {f: open(os.path.join(path, f), "rb").read() for f in sorted(os.listdir(path))}


@pytest.fixture
def out_dir(tiny_chain, tmp_path):
    """An out_dir that already holds a checkpoint (a copy of the SFT model): no failure may touch it."""
    out = tmp_path / "out"
    shutil.copytree(tiny_chain["sft"], out)
    return out


def run_stage(stage, argv, capsys, monkeypatch):
    """The stage as its command line runs it (common.run): returns (exit status, stderr)."""
    monkeypatch.setattr(sys, "argv", [stage.__name__ + ".py", *argv])
    with pytest.raises(SystemExit) as e:
        common.run(stage.main, stage.Config)
        sys.exit(0)
    return e.value.code, capsys.readouterr().err


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


PAIR = {"prompt": "Human: Hi?\n\nAssistant:", "chosen": " Hello.", "rejected": " Go away."}


@pytest.mark.parametrize("case", ["malformed_json", "missing_field", "empty_file", "response_never_fits",
                                  "init_missing", "init_not_a_checkpoint", "lm_where_scalar_needed",
                                  "scalar_where_lm_needed", "tokenizer_mismatch", "unknown_key", "wrong_type",
                                  "ppo_no_room_for_prompt", "resume_without_state", "uneven_micro_batches",
                                  "no_length_groups", "ema_out_of_range", "gold_reward_without_value",
                                  "gold_reward_with_data", "eval_every_zero", "ppo_temperature_zero",
                                  "negative_warmup", "rm_context_shorter", "val_fraction_one", "ppo_minibatch_zero",
                                  "ppo_minibatch_not_dividing", "ppo_few_prompts", "epochs_zero", "ppo_iterations_zero",
                                  "ppo_epochs_zero", "ppo_generation_batch_negative", "negative_lm_coef", "dtype_float16"])
def test_refused_with_one_line_and_out_dir_untouched(case, tiny_chain, out_dir, tmp_path, capsys, monkeypatch):
    before = snapshot(out_dir)
    sft_ckpt, rm_ckpt = tiny_chain["sft"], tiny_chain["rm"]
    common_args = ["--out_dir", str(out_dir), "--device", "cpu"]
    if case == "malformed_json":
        data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "b"}, '{"prompt": "a", "completion"'])
        stage, argv, message = sft, ["--init", sft_ckpt, "--data", data], f"{data}:2: not valid JSON"
    elif case == "missing_field":
        data = write_jsonl(tmp_path / "d.jsonl", [PAIR, {"prompt": "x", "chosen": "y"}])
        stage, argv, message = dpo, ["--init", sft_ckpt, "--data", data], f"{data}:2: missing field 'rejected'"
    elif case == "empty_file":
        data = write_jsonl(tmp_path / "d.jsonl", [])
        stage, argv, message = reward, ["--init", sft_ckpt, "--data", data], f"{data}: no rows (the file is empty)"
    elif case == "response_never_fits":
        data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Human: Talk.\n\nAssistant:", "completion": " la" * 200}])
        stage, argv = sft, ["--init", sft_ckpt, "--data", data]
        message = f"every one of 1 examples has a response too long for the context of 64 tokens (e.g. {data}:1)"
    elif case == "init_missing":
        stage, argv, message = sft, ["--init", str(tmp_path / "nope")], f"{tmp_path / 'nope'}: no such checkpoint directory"
    elif case == "init_not_a_checkpoint":
        (tmp_path / "notes").mkdir()
        (tmp_path / "notes" / "config.json").write_text("{not json")
        stage, argv, message = dpo, ["--init", str(tmp_path / "notes")], f"{tmp_path / 'notes'}/config.json is not valid JSON"
    elif case == "lm_where_scalar_needed":
        stage, argv = ppo, ["--policy", sft_ckpt, "--reward", sft_ckpt]
        message = f"{sft_ckpt} has a lm head, but a scalar head is needed here"
    elif case == "scalar_where_lm_needed":
        stage, argv, message = sft, ["--init", rm_ckpt], f"{rm_ckpt} has a scalar head, but a lm head is needed here"
    elif case == "tokenizer_mismatch":  # a reward model trained with another tokenizer than the policy
        other = tmp_path / "rm_gpt2"
        shutil.copytree(rm_ckpt, other)
        info = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**info, "tokenizer": "gpt2"}))
        stage, argv = ppo, ["--policy", sft_ckpt, "--reward", str(other)]
        message = f"{other} was trained with tokenizer 'gpt2', but this run uses 'builtin'"
    elif case == "unknown_key":
        stage, argv, message = dpo, ["--init", sft_ckpt, "--betta", "0.1"], "unknown argument --betta"
    elif case == "wrong_type":
        stage, argv, message = reward, ["--init", sft_ckpt, "--epochs", "many"], "--epochs: expected float, got 'many'"
    elif case == "ppo_no_room_for_prompt":
        stage, argv = ppo, ["--policy", sft_ckpt, "--reward", rm_ckpt, "--max_new_tokens", "63"]
        message = f"--max_new_tokens 63 leaves no room for a prompt in {sft_ckpt}'s context of 64"
    elif case == "resume_without_state":  # out_dir holds a finished checkpoint: nothing to resume
        stage, argv = sft, ["--init", sft_ckpt, "--n_demos", "40", "--resume"]
        message = f"--resume: {out_dir}/resume.safetensors does not exist"
    elif case == "uneven_micro_batches":
        stage, argv = sft, ["--init", sft_ckpt, "--batch_size", "8", "--micro_batch_size", "3"]
        message = "--batch_size 8 is not a multiple of --micro_batch_size 3 x 1 processes"
    elif case == "ema_out_of_range":
        stage, argv, message = reward, ["--init", sft_ckpt, "--ema", "1"], "--ema must be in [0, 1), got 1.0"
    elif case == "gold_reward_without_value":  # the oracle has no network to start the value model from
        stage, argv = ppo, ["--policy", sft_ckpt, "--reward", "gold"]
        message = "--reward gold has no reward model to start the value model from: pass --value (e.g. out/rm)"
    elif case == "gold_reward_with_data":  # the judge knows the built-in questions only
        data = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Human: Hi?\n\nAssistant:"}])
        stage, argv = ppo, ["--policy", sft_ckpt, "--reward", "gold", "--value", rm_ckpt, "--data", data]
        message = "--reward gold judges the built-in prompts only: drop --data"
    elif case == "eval_every_zero":
        stage, argv, message = dpo, ["--init", sft_ckpt, "--eval_every", "0"], "--eval_every must be at least 1, got 0"
    elif case == "ppo_temperature_zero":  # the log-probs are taken at the sampling temperature
        stage, argv = ppo, ["--policy", sft_ckpt, "--reward", rm_ckpt, "--temperature", "0"]
        message = "--temperature must be positive, got 0.0"
    elif case == "negative_warmup":
        stage, argv, message = ppo, ["--warmup_iterations", "-1"], "--warmup_iterations must be at least 0, got -1"
    elif case == "rm_context_shorter":  # a reward model of 32 positions for a policy of 64
        rm, info = load_checkpoint(rm_ckpt, head="scalar")
        short = tmp_path / "rm_short"
        meta = {k: v for k, v in info.items() if k != "model"}
        save_checkpoint(short, GPT(GPTConfig(**{**asdict(rm.config), "block_size": 32})), meta)
        stage, argv = ppo, ["--policy", sft_ckpt, "--reward", str(short)]
        message = f"{short} has a context of 32 tokens, shorter than the policy {sft_ckpt}'s 64"
    elif case == "val_fraction_one":
        stage, argv = sft, ["--init", sft_ckpt, "--n_demos", "40", "--val_fraction", "1"]
        message = "--val_fraction must be in [0, 1), got 1.0"
    elif case == "ppo_minibatch_zero":  # PPO has no --micro_batch_size for the message to name
        stage, argv, message = ppo, ["--minibatch_size", "0"], "--minibatch_size must be at least 1, got 0"
    elif case == "ppo_minibatch_not_dividing":  # a leftover minibatch would take a full step on fewer responses
        stage, argv, message = ppo, ["--rollout_batch", "7", "--minibatch_size", "3"], "--rollout_batch 7 is not a multiple of --minibatch_size 3"
    elif case == "ppo_few_prompts":
        data = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"Human: {w}?"} for w in "abc"])
        stage, argv = ppo, ["--policy", sft_ckpt, "--reward", rm_ckpt, "--data", data, "--rollout_batch", "4", "--minibatch_size", "2"]
        message = f"{data}: 3 prompts, fewer than --rollout_batch 4"
    elif case == "epochs_zero":
        stage, argv = sft, ["--init", sft_ckpt, "--n_demos", "40", "--epochs", "0"]
        message = "--epochs must be positive, got 0.0"
    elif case == "ppo_iterations_zero":
        stage, argv, message = ppo, ["--iterations", "0"], "--iterations must be at least 1, got 0"
    elif case == "ppo_epochs_zero":  # it would write the policy unchanged as a PPO result
        stage, argv, message = ppo, ["--ppo_epochs", "0"], "--ppo_epochs must be at least 1, got 0"
    elif case == "ppo_generation_batch_negative":
        stage, argv, message = ppo, ["--generation_batch", "-1"], "--generation_batch must be 0 (all at once) or more, got -1"
    elif case == "negative_lm_coef":
        stage, argv, message = reward, ["--init", sft_ckpt, "--lm_coef", "-1"], "--lm_coef must be 0 (off) or more, got -1.0"
    elif case == "dtype_float16":  # no loss scaling: its gradients would round to 0
        stage, argv = sft, ["--init", sft_ckpt, "--dtype", "float16"]
        message = "--dtype float16: training in float16 needs loss scaling"
    elif case == "no_length_groups":
        stage, argv, message = dpo, ["--init", sft_ckpt, "--length_groups", "0"], "--length_groups must be at least 1, got 0"
    status, err = run_stage(stage, argv + common_args, capsys, monkeypatch)
    assert status == 1
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert snapshot(out_dir) == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p or p.endswith(".old")]  # no half write left


def tree(path):
    """Every file under path (or path itself, a file) and its bytes."""
    if os.path.isfile(path):
        return {".": open(path, "rb").read()}
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


@pytest.mark.parametrize("layout", ["a_file_inside", "checkpoints_inside", "a_file", "the_working_directory"])
def test_an_out_dir_that_is_not_a_checkpoint_is_refused_before_training(layout, tiny_chain, tmp_path, capsys, monkeypatch):
    """Writing a checkpoint replaces its whole directory: `--out_dir out` would delete out/sft, out/rm, ...
    So a stage refuses, at once, any out_dir that exists and holds more than a checkpoint's files."""
    target = tmp_path / "target"
    if layout == "a_file":
        target.write_text("my notes")
    else:
        target.mkdir()
        if layout == "a_file_inside":
            shutil.copytree(tiny_chain["sft"], target, dirs_exist_ok=True)  # a checkpoint, and something more
            (target / "notes.txt").write_text("my notes")
        elif layout == "checkpoints_inside":
            shutil.copytree(tiny_chain["sft"], target / "sft")
        else:
            monkeypatch.chdir(target)
            (target / "notes.txt").write_text("my notes")
    before = tree(target)
    trained = []
    monkeypatch.setattr(sft, "sft_loss", lambda *a: trained.append(1))  # must never be reached
    status, err = run_stage(sft, ["--init", tiny_chain["sft"], "--n_demos", "40", "--device", "cpu",
                                  "--out_dir", "." if layout == "the_working_directory" else str(target)], capsys, monkeypatch)
    assert status == 1 and err.count("\n") == 1 and err.startswith("error: --out_dir "), err
    assert tree(target) == before and not trained
    if layout == "a_file_inside":  # the model export is refused the same way
        with pytest.raises(common.UserError, match="notes.txt"):
            export_hf(GPT(GPTConfig(vocab_size=50257, n_layer=1, n_head=1, n_embd=8, block_size=8)), str(target))
        assert tree(target) == before


@pytest.mark.parametrize("stage, flag", [(sft, "--init"), (reward, "--init"), (dpo, "--init"), (ppo, "--policy"),
                                         (ppo, "--reward"), (ppo, "--value")])
def test_an_out_dir_that_the_run_reads_is_refused_before_any_work(stage, flag, tiny_chain, tmp_path, capsys, monkeypatch):
    """`ppo.py --reward out/x --out_dir out/x` replaced the reward model with the policy and exited 0;
    `dpo.py --init out/x --out_dir out/x` lost its init and, resumed, took its own last save as the
    frozen reference. A run must not write over a checkpoint it reads (a symbolic link is its target)."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_chain["rm" if flag in ("--reward", "--value") else "sft"], ckpt)
    link = tmp_path / "link"
    link.symlink_to(ckpt)
    before = tree(ckpt)
    flags = {"--" + name for name in stage.Config.__dataclass_fields__}
    args = {"--init": tiny_chain["sft"], "--policy": tiny_chain["sft"], "--reward": tiny_chain["rm"], "--value": tiny_chain["rm"]}
    args = {k: v for k, v in args.items() if k in flags}
    argv = [x for k, v in {**args, flag: str(ckpt)}.items() for x in (k, v)] + ["--device", "cpu", "--out_dir", str(link)]
    status, err = run_stage(stage, argv, capsys, monkeypatch)
    assert status == 1 and err == f"error: --out_dir {ckpt} is also {flag}: the run would overwrite a checkpoint it reads; " \
                                  f"name another directory\n", err
    assert tree(ckpt) == before


def test_the_oracle_reads_no_directory_called_gold(tiny_chain, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # --out_dir gold: no checkpoint this run reads, though --reward is "gold"
    ppo.main(ppo.Config(policy=tiny_chain["sft"], reward="gold", value=tiny_chain["rm"], out_dir="gold", iterations=1,
                        rollout_batch=4, minibatch_size=4, max_new_tokens=4, device="cpu"))
    assert load_checkpoint(tmp_path / "gold")[1]["stage"] == "ppo"


def test_an_export_over_its_own_checkpoint_is_refused(tiny_chain, tmp_path, monkeypatch):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_chain["sft"], ckpt)
    before = tree(ckpt)
    monkeypatch.setattr(sys, "argv", ["model.py", "export", str(ckpt), str(ckpt)])
    import runpy
    with pytest.raises(SystemExit, match=r"^error: OUT_DIR \S+ckpt is also CKPT_DIR"):
        runpy.run_module("model", run_name="__main__")
    assert tree(ckpt) == before


def test_device_and_dtype_are_checked():
    with pytest.raises(common.UserError, match="--device 'gpu0' is not a device"):
        common.setup_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(common.UserError, match="--device cuda: this machine has 0 CUDA device"):
            common.setup_device("cuda")
    with pytest.raises(common.UserError, match="--dtype float16: training in float16 needs loss scaling"):
        common.setup_device("cpu", "float16")
    calls = []  # a second GPU, alone: it becomes the current device, where Triton launches its kernels
    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        m.setattr(torch.cuda, "device_count", lambda: 2)
        m.setattr(torch.cuda, "set_device", lambda d: calls.append(str(d)))
        assert str(common.setup_device("cuda:1", "float32")[0]) == "cuda:1" and calls == ["cuda:1"]
        with pytest.raises(common.UserError, match="--device cuda:2: this machine has 2 CUDA device"):
            common.setup_device("cuda:2")
    device, autocast = common.setup_device("cpu", "float16", training=False)  # inference may
    assert device.type == "cpu" and autocast.fast_dtype == torch.float16
    assert isinstance(common.setup_device("cpu", "auto")[1], contextlib.nullcontext)


@pytest.mark.parametrize("stage", [sft, dpo, reward, ppo], ids=lambda stage: stage.__name__)
def test_no_warm_up_starts_at_the_peak_learning_rate(stage, tiny_chain, tmp_path):
    """--warmup_steps 0 (PPO: --warmup_iterations 0) is no warm-up, as in pretrain.py."""
    out, data = tmp_path / "out", write_jsonl(tmp_path / "d.jsonl", [{**PAIR, "prompt": f"Human: {w}?"} for w in "abcd"])
    if stage is ppo:  # its log has no lr: the run must simply go through
        ppo.main(ppo.Config(policy=tiny_chain["sft"], reward=tiny_chain["rm"], out_dir=str(out), data=data, iterations=1,
                            rollout_batch=4, minibatch_size=4, ppo_epochs=1, max_new_tokens=4, warmup_iterations=0, device="cpu"))
    else:
        cfg = stage.Config(init=tiny_chain["sft"], out_dir=str(out), data=data, batch_size=2, epochs=1, warmup_steps=0,
                           device="cpu")
        stage.main(cfg)
        assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["lr"] == cfg.lr
    assert (out / "model.safetensors").exists()


def nan_from_step(monkeypatch, module, name, step):
    """Make module.name return NaN (its first output, if a tuple) from the given training step on
    (counting its calls with gradients)."""
    real, calls = getattr(module, name), [0]

    def poisoned(*args, **kwargs):  # training calls only: evaluation runs without gradients
        out = real(*args, **kwargs)
        if not torch.is_grad_enabled():
            return out
        calls[0] += 1
        if calls[0] <= step:
            return out
        return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
    monkeypatch.setattr(module, name, poisoned)


def test_a_nan_loss_stops_sft_at_its_step_and_keeps_the_last_good_checkpoint(tiny_chain, out_dir, monkeypatch):
    cfg = sft.Config(init=tiny_chain["sft"], out_dir=str(out_dir), n_demos=200, epochs=1, batch_size=16,
                     length_groups=1, log_every=100, n_samples=1, device="cpu")  # one loss call a step
    before = snapshot(out_dir)
    nan_from_step(monkeypatch, sft, "sft_loss", 7)
    with pytest.raises(common.NumericalError, match=r"^step 7: the loss is nan; stopped before the update"):
        sft.main(cfg)
    assert snapshot(out_dir) == before  # no --save_every: the old checkpoint stays
    cfg.save_every = 3
    monkeypatch.undo()
    nan_from_step(monkeypatch, sft, "sft_loss", 7)
    with pytest.raises(common.NumericalError, match=r"^step 7: the loss is nan"):
        sft.main(cfg)
    state = json.loads((out_dir / "resume.json").read_text())
    info = json.loads((out_dir / "config.json").read_text())
    assert state["step"] == 6 and info["metrics"] == {"steps_done": 6} and info["stage"] == "sft"
    assert len((out_dir / "metrics.jsonl").read_text().splitlines()) == 1  # the step-0 log line


def test_a_nan_gradient_under_a_finite_loss_stops_sft_before_the_update(tiny_chain, out_dir, monkeypatch):
    """From step 3 the loss gains sqrt(|w - w|^2): 0 in value, NaN in gradient (an overflowing backward,
    as bf16 may give). The stage stops at that step with the weights unchanged on disk."""
    cfg = sft.Config(init=tiny_chain["sft"], out_dir=str(out_dir), n_demos=200, epochs=1, batch_size=16,
                     length_groups=1, log_every=100, n_samples=1, device="cpu")
    before, real, calls = snapshot(out_dir), sft.sft_loss, [0]

    def poisoned(model, x, y):
        loss = real(model, x, y)
        calls[0] += torch.is_grad_enabled()
        if calls[0] <= 3 or not torch.is_grad_enabled():
            return loss
        w = next(model.parameters())
        return loss + torch.sqrt((w - w.detach()).pow(2).sum())
    monkeypatch.setattr(sft, "sft_loss", poisoned)
    with pytest.raises(common.NumericalError, match=r"^step 3: the gradient norm is nan; stopped before the update"):
        sft.main(cfg)
    assert snapshot(out_dir) == before


def test_a_nan_loss_stops_dpo(tiny_chain, out_dir, monkeypatch):
    before = snapshot(out_dir)
    nan_from_step(monkeypatch, dpo, "dpo_loss", 2)
    with pytest.raises(common.NumericalError, match=r"^step 2: the loss is nan"):
        dpo.main(dpo.Config(init=tiny_chain["sft"], out_dir=str(out_dir), n_prompts=20, pairs_per_prompt=4,
                            sft_samples=0, batch_size=4, length_groups=1, n_samples=1, device="cpu"))  # one loss call a step
    assert snapshot(out_dir) == before


def test_ppo_skips_and_counts_minibatches_whose_ratio_explodes(tiny_chain, tmp_path):
    """With --max_ratio just above 1 every minibatch after the first of an iteration is 'exploding'
    (the first is on-policy: ratio exactly 1), so exactly 3 of the 4 steps are skipped each time."""
    out = tmp_path / "ppo"
    ppo.main(ppo.Config(policy=tiny_chain["sft"], reward=tiny_chain["rm"], out_dir=str(out), iterations=2,
                        rollout_batch=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=8, warmup_iterations=1,
                        max_ratio=1 + 1e-6, device="cpu"))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [3, 3]
    assert all(r["ratio_max"] > 1 + 1e-6 for r in rows)
    # the means are the kept minibatch's: on-policy, its ratio exactly 1
    assert all(r["ratio_mean"] == pytest.approx(1.0, abs=1e-5) and r["approx_kl"] == pytest.approx(0, abs=1e-8) for r in rows)


def test_a_ppo_iteration_that_skips_every_step_logs_strict_json(tiny_chain, tmp_path, monkeypatch):
    """A skipped minibatch's loss and ratio went into the iteration's means, where an infinite ratio
    wrote Infinity and NaN into metrics.jsonl and config.json. Now its numbers stay out; with every
    one skipped the means are null, and a ratio that is not finite is logged as null."""
    real = ppo.policy_loss

    def exploding(*args):  # the second minibatch of each iteration: one token's ratio infinite
        pg, ratio, clipfrac = real(*args)
        calls.append(1)
        return (pg, ratio.detach().clone().fill_(float("inf")), clipfrac) if len(calls) % 2 == 0 else (pg, ratio, clipfrac)
    calls = []
    monkeypatch.setattr(ppo, "policy_loss", exploding)
    out = tmp_path / "ppo"
    args = dict(policy=tiny_chain["sft"], reward=tiny_chain["rm"], iterations=2, rollout_batch=8, minibatch_size=4, ppo_epochs=1,
                max_new_tokens=8, warmup_iterations=1, device="cpu")
    ppo.main(ppo.Config(out_dir=str(out), **args))

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
    rows = [strict(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [1, 1] and all(r["ratio_max"] is None for r in rows)
    assert all(math.isfinite(r["pg_loss"]) and r["ratio_mean"] == pytest.approx(1.0, abs=1e-5) for r in rows)
    strict((out / "config.json").read_text())
    calls.append(1)  # now the first minibatch of each iteration explodes: first_ratio too is not finite
    ppo.main(ppo.Config(out_dir=str(tmp_path / "first"), **args))
    rows = [strict(line) for line in (tmp_path / "first" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["first_ratio"] is None and r["ratio_max"] is None for r in rows)
    monkeypatch.undo()
    ppo.main(ppo.Config(out_dir=str(tmp_path / "none"), max_ratio=0.5, **args))  # the first's ratio, 1, is above it
    rows = [strict(line) for line in (tmp_path / "none" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows] == [2, 2] and all(r["pg_loss"] is None and r["first_ratio"] == 1.0 for r in rows)


@pytest.mark.parametrize("flags, message", [
    (dict(max_new_tokens=0), "--max_new_tokens must be at least 1, got 0"),
    (dict(kl_estimator="k2"), "--kl_estimator must be k1 or k3, not 'k2'"),
    (dict(adaptive_kl=True, target_kl=0.0), "--adaptive_kl needs --target_kl and --kl_horizon above 0, got 0.0 and 10000"),
    (dict(adaptive_kl=True, kl_horizon=0), "--adaptive_kl needs --target_kl and --kl_horizon above 0, got 2.0 and 0"),
])
def test_ppo_refuses_flags_that_failed_after_loading_every_model(flags, message, tiny_chain, tmp_path, monkeypatch):
    monkeypatch.setattr(ppo, "load_checkpoint", lambda *a, **k: pytest.fail("loaded a model before refusing"))
    with pytest.raises(common.UserError, match=f"^{message}$"):
        ppo.main(ppo.Config(policy=tiny_chain["sft"], reward=tiny_chain["rm"], out_dir=str(tmp_path / "ppo"), device="cpu", **flags))
